"""Where episodes run: the runner (in-process, worker processes, Ray), weights that travel with jobs, collection into a store."""
