"""Working from files: masks files, diff (local and hub), overlap, update rank, subnetwork training."""
