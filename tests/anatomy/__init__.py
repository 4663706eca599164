"""Where a parameter sits: layers, kinds, experts and towers of real architectures, and the MoE views."""
