"""Training: the run around the Trainer, its measurements and display, devices, processes, signals."""
