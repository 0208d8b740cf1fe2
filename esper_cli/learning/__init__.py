"""Learning Tamiyo: behaviour cloning, offline AWR, PPO (`simic improve`), DAgger, and the scores training reports."""
