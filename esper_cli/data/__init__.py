"""Episode data: the HDF5 store, a store as a training set, preprocessing, replay, and exports for offline RL."""
