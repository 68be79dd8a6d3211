"""One training loop for every capability: a `TrainTask` says what to train, the `Trainer` how."""
