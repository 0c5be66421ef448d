

def test_rope_scores_depend_only_on_frame_offsets():
    """A rolling window needs no re-based positions: keys are rotated at their absolute frame, the
    query at its own, and q.k depends on the offset alone (angles in float64), so frame 1,000 of a
    window of 3 scores its keys exactly as frame 3 did in training."""
    from scd.model import apply_rope, rope_tables

    q, k = torch.randn(16, 16, dtype=torch.float64).float(), torch.randn(3 * 16, 16)

    def scores(first: int):
        cos, sin = rope_tables(torch.arange(first, first + 4), 4, 4, (4, 6, 6))
        t = 16
        return apply_rope(q, cos[3 * t:], sin[3 * t:]) @ apply_rope(k, cos[:3 * t], sin[:3 * t]).T

    assert torch.allclose(scores(0), scores(997), atol=1e-4) and torch.allclose(scores(0), scores(99_997), atol=1e-3)
