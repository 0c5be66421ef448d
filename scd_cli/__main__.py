from scd_cli.app import main

main()
