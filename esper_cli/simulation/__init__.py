"""One morphogenetic training run: seed blueprints, the environment stepped one epoch per decision, run_episode, the core plugin."""
