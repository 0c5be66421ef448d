"""Few-step distillation of an SCD decoder: trajectory (ODE) distillation onto a many-step teacher.

The objective. For every frame a true clip lets the decoder make under teacher forcing, the
student's K-step sample, unrolled with gradients through its K decoder steps, is regressed (mean
squared error) onto the teacher's N-step deterministic ODE sample from the same initial noise and
the same encoder features:

    loss = || sample_K(student decoder; z, features) - ode_N(teacher decoder; z, features) ||^2

(knowledge distillation of a sampler, Luhman & Luhman 2021, applied to SCD's decoder alone). Why
this one here: it is exact to specify (the target is a deterministic function of the noise and
the context, so a student equal to the teacher at K = N has a loss of exactly 0), it needs no
second network (DMD, the paper's and Self-Forcing's objective, trains a fake score beside the
student and reads a real score), it has no adversarial or score-estimation noise to tune, and a
step costs one encoder pass, N teacher decoder steps without gradients and K student steps with
them: affordable on a CPU. Its known weakness is that a regressed few-step sampler averages where
the teacher's map is hard to follow in K steps (blur at K = 1); DMD matches distributions instead,
which is why full-size runs use it (docs/training.md, "Few-step distillation").

The encoder is frozen and shared: the paper distils the decoder, and SCD's point is that the
encoder's features do not depend on the number of decoder steps. The teacher's encoder makes the
features once per step (teacher forcing: clean true frames, one pass over the clip) and both
decoders read them; the student's encoder must equal the teacher's (checked), so the folder it
writes holds the encoder its decoder was trained against.

Samplers are the models' own. A flow-matching Euler model (the FAR-style family): the student's
K Euler steps along `sampling.sigma_schedule(K)`, the teacher's N. A re-noising model (Self-
Forcing's sampler, the Wan family): the student runs its K re-noising steps with fresh noise drawn
each training step, as it does when generating; the teacher runs the deterministic form of the
same sampler, re-noising with its own predicted noise, which is the Euler step of the flow ODE
along the shifted schedule (DDIM). Neither family's code is named here: the models give
`generated_frames`, `teacher_forced_features` and `frame_velocity`; the config gives the sampler.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F

from scd import checks
from scd.errors import ConfigError
from scd.loaded import LoadedModel
from scd.sampling import even_steps, renoise, renoise_schedule, sigma_schedule

OBJECTIVE = "trajectory"
# training settings that belong to the flow-matching loss: distillation has no use for them
UNUSED_SETTINGS = ("sigma_shift", "decoder_draws", "clean_context_ratio", "context_sigma_max")
# config fields that only say how a model folder generates by default: student and teacher may differ in them
GENERATION_FIELDS = ("context_frames", "window", "default_steps", "default_guidance", "default_samples", "denoising_steps")


# ----------------------------------------------------------------------------- samplers, with gradients

def schedule(config, steps: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The timesteps (K,) a model of `config` runs at `steps` and its noise levels (K + 1,), float32,
    ending at 0: Euler's `sigma_schedule`, or the re-noising sampler's shifted list."""
    if config.sampler == "renoise":
        timesteps, sigmas = renoise_schedule(config.denoising_steps, config.timestep_shift, config.warp_steps, steps)
        return timesteps, torch.cat([sigmas, sigmas.new_zeros(1)])
    sigmas = sigma_schedule(steps)
    return sigmas[:-1] * 1000.0, sigmas


def sample(config, velocity, noise: torch.Tensor, steps: int, draws: torch.Tensor | None = None,
           ode: bool = False) -> torch.Tensor:
    """A model's `steps`-step sample of frames from `noise` (B, G, C, H, W) float32, differentiable
    (nothing in place). `velocity(x, timesteps (B,))` is a `frame_velocity`. Euler models: Euler
    steps, as `sampling.denoise`. Re-noising models: `sampling.renoise`, re-noised with `draws`
    (steps - 1, B, G, C, H, W), or (`ode`) with the model's own predicted noise, the deterministic
    sampler that follows the flow ODE."""
    timesteps, sigmas = schedule(config, steps)
    timesteps = timesteps.to(noise.device)
    batch = noise.shape[0]
    if config.sampler == "renoise":
        levels = sigmas.tolist()
        predicted = []

        def flow(x, t, k):
            v = velocity(x, t)
            if ode:  # the noise this step predicts: x = (1 - sigma) x0 + sigma noise, v = noise - x0
                predicted[:] = [x.float() + (1 - levels[k]) * v.float()]
            return v

        def draw(k):
            return predicted[0] if ode else draws[k]

        if not ode and steps > 1 and (draws is None or tuple(draws.shape) != (steps - 1, *noise.shape)):
            raise ConfigError(f"draws must be {(steps - 1, *noise.shape)}", parameter="draws")
        return renoise(flow, noise, timesteps, sigmas[:-1], draw)
    deltas = (sigmas[1:] - sigmas[:-1]).tolist()
    x = noise
    for k, delta in enumerate(deltas):
        v = velocity(x, timesteps[k].expand(batch)).float()
        x = torch.add(x, v, alpha=delta)
    return x


def draw_count(config, steps: int) -> int:
    """Re-noising draws a sampler of `config` takes at `steps` (0 for Euler)."""
    return steps - 1 if config.sampler == "renoise" else 0


def with_steps(config, steps: int):
    """`config` with `steps` as its default number of denoising steps (a re-noising model: its
    step list, spread evenly over 1000 unless it already has that many)."""
    if config.sampler == "renoise":
        listed = config.denoising_steps if len(config.denoising_steps) == steps else even_steps(steps)
        return dataclasses.replace(config, denoising_steps=tuple(listed))
    return dataclasses.replace(config, default_steps=steps)


# ----------------------------------------------------------------------------- the objective

class TrajectoryDistillation:
    """The loss `scd.train.train` minimises instead of a model's own (its `loss` argument): called
    as `objective(student, video, conditions, training_objective)` with a batch of clean clips
    (B, N, C, H, W) and their conditions (actions, labels, or text embeddings), it returns the mean
    squared error between the student's `steps`-step samples and the frozen teacher's
    `teacher_steps`-step ODE samples of every generated frame. The initial noise, and a re-noising
    student's draws, come from torch's global generator on the CPU (which a checkpoint keeps), so a
    resumed run is the straight one. Build it with `distillation`."""

    def __init__(self, teacher: torch.nn.Module, steps: int, teacher_steps: int, source: str = "the teacher"):
        self.teacher = teacher.eval().requires_grad_(False)
        self.steps, self.teacher_steps, self.source = steps, teacher_steps, source

    @property
    def key(self) -> str:
        """What a checkpoint records of the objective; a resumed run must have the same."""
        return f"{OBJECTIVE} {self.steps} from {self.teacher_steps}"

    def __call__(self, student, video: torch.Tensor, conditions, objective=None) -> torch.Tensor:
        frames = student.generated_frames(video.shape[1])
        shape = (video.shape[0], len(range(video.shape[1])[frames]), *video.shape[2:])
        noise = torch.randn(shape).to(video.device)
        count = draw_count(student.config, self.steps)
        draws = torch.randn(count, *shape).to(video.device) if count else None
        return self.loss(student, video, conditions, noise, draws)

    def loss(self, student, video: torch.Tensor, conditions, noise: torch.Tensor,
             draws: torch.Tensor | None = None) -> torch.Tensor:
        """The loss for given initial noise (B, G, C, H, W) of the generated frames (and re-noising
        draws (K - 1, B, G, C, H, W)): differentiable in the student's decoder only."""
        teacher = self.teacher
        weight = next(teacher.parameters())
        if weight.device != video.device:
            teacher.to(video.device)
        first = first_timestep(student.config, self.steps)
        with torch.no_grad():
            features = teacher.teacher_forced_features(video, conditions, noise, first)
            target = sample(teacher.config, teacher.frame_velocity(features, conditions), noise, self.teacher_steps,
                            ode=True)
        velocity = student.frame_velocity(features, conditions)
        prediction = sample(student.config, velocity, noise, self.steps, draws)
        return F.mse_loss(prediction.float(), target.float())

    def gap(self, student, video: torch.Tensor, conditions, noise: torch.Tensor,
            draws: torch.Tensor | None = None) -> float:
        """`loss` without gradients, as a number: how far the student's few-step samples are from
        the teacher's (held-out clips and noise measure distillation's progress)."""
        with torch.no_grad():
            return float(self.loss(student, video, conditions, noise, draws))

    def card(self, base):
        """The model card function (`scd.cards.training_card`) with a line on the distillation."""
        line = (f"- distillation: trajectory (ODE) distillation of the decoder to {self.steps} steps, regressed onto "
                f"{self.source} at {self.teacher_steps} steps (same noise, same encoder features; encoder frozen)\n")

        def card(losses, wall_s):
            text = base(losses, wall_s)
            head, sep, rest = text.partition("\n\n")
            return head + sep + line + rest

        return card


def first_timestep(config, steps: int) -> float:
    """The timestep of a sampler's first step, at which a model whose encoder reads the frame being
    made (SCD from Wan) sees its noise."""
    return float(schedule(config, steps)[0][0])


# ----------------------------------------------------------------------------- set-up, with its checks

def distillation(teacher: LoadedModel | None, student: LoadedModel | None, steps: int | None,
                 teacher_steps: int | None = None, settings=None) -> TrajectoryDistillation:
    """The distillation objective of `student` (a copy of the teacher, or an earlier student of it)
    onto `teacher` at `teacher_steps` (default: the teacher's default steps), the student to run
    `steps`. Refused, naming the parameter (ConfigError): a missing teacher or step count, a
    student or teacher that is not SCD, a student of another architecture or size than the teacher
    or with another encoder, steps >= teacher_steps, and training settings that only the
    flow-matching loss reads (`settings`, a `scd.train.TrainSettings`). Freezes the student's
    encoder and sets its default steps to `steps` (default guidance 1: the teacher is sampled
    without guidance)."""
    if teacher is None:
        raise ConfigError("distillation needs a teacher: give distill_from, the model folder whose many-step samples "
                          "the student learns to match", parameter="distill_from")
    if steps is None:
        raise ConfigError("distillation needs the student's number of steps: give distill_steps", parameter="distill_steps")
    t, s = teacher.config, student.config
    if t.arch != "scd":
        raise ConfigError(f"the teacher {teacher.source} is a {t.architecture}: distillation trains an SCD model's "
                          "decoder, so the teacher must be an SCD model (convert a baseline first: scd convert)",
                          parameter="distill_from")
    if s.arch != "scd":
        raise ConfigError(f"the student {student.source} is a {s.architecture}, not an SCD model: start it from the "
                          "teacher (leave out init)", parameter="init")
    differ = _architecture_differences(s, t)
    if differ:
        raise ConfigError(f"the student {student.source} and the teacher {teacher.source} are different models "
                          f"({differ}): the student must have the teacher's architecture and size (leave out init to "
                          "start from the teacher)", parameter="init", others=("distill_from",))
    teacher_steps = t.default_steps if teacher_steps is None else teacher_steps
    checks.number("distill_steps", steps, 1, 1000, integer=True)
    checks.number("teacher_steps", teacher_steps, 1, 1000, integer=True)
    if steps >= teacher_steps:
        raise ConfigError(f"distill_steps ({steps}) must be fewer than teacher_steps ({teacher_steps}): the student "
                          "learns to do in fewer steps what the teacher does in more", parameter="distill_steps",
                          others=("teacher_steps",))
    if first_timestep(s, steps) != first_timestep(t, teacher_steps):
        raise ConfigError("the student's and the teacher's step lists start at different timesteps: the encoder would "
                          "see their noise differently", parameter="distill_steps")
    if settings is not None:
        defaults = type(settings)()
        for name in UNUSED_SETTINGS:
            if getattr(settings, name) != getattr(defaults, name):
                raise ConfigError(f"{name} belongs to the flow-matching loss; distillation does not read it: leave it "
                                  "out", parameter=name)
    if not _same_encoder(student.model, teacher.model):
        raise ConfigError(f"the student {student.source} has another encoder than the teacher {teacher.source}: the "
                          "decoder is distilled against the teacher's (frozen) encoder features, so the student must "
                          "carry that encoder (start from the teacher: leave out init)", parameter="init")
    student.model.encoder.requires_grad_(False)
    config = with_steps(s, steps)
    if getattr(config, "default_guidance", 1.0) != 1.0:
        config = dataclasses.replace(config, default_guidance=1.0)
    student.config = student.model.config = config
    return TrajectoryDistillation(teacher.model, steps, teacher_steps, f"`{teacher.source}`")


def _architecture_differences(student, teacher) -> str:
    a, b = student.to_dict(), teacher.to_dict()
    keys = [k for k in sorted(set(a) | set(b)) if k not in GENERATION_FIELDS and a.get(k) != b.get(k)]
    return ", ".join(f"{k} {a.get(k)!r} vs {b.get(k)!r}" for k in keys[:4])


def _same_encoder(student, teacher) -> bool:
    mine, theirs = student.encoder.state_dict(), teacher.encoder.state_dict()
    return mine.keys() == theirs.keys() and all(torch.equal(v, theirs[k].to(v)) for k, v in mine.items())
