from rlr_core.training.cli import main

main()
