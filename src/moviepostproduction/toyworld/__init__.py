"""The toy world: the procedural scenes the project trains and evaluates on offline (DESIGN 6), its shards, the
toy encoders / VAE / model dir it builds, tiny random model dirs of the real classes, and the toy evaluation."""
