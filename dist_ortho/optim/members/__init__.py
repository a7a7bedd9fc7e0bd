"""The members of the Muon family: each module keeps one member's math (its update, state and checks) on top of
dist_ortho.optim.base's step."""
