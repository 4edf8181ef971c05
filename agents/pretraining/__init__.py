"""Pre-training of the GPR generator (MTP, VAFT)."""
