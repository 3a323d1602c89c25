"""Training in NumPy with hand-written gradients: sparse autoencoders (``training.sae``), toy models of
superposition (``training.toy_models``) and the optimiser they share (``training.optim``)."""
