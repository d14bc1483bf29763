"""Learning from people: the reward proxy fitted to ratings and comparisons, and the active
selection of the next pair to compare."""
