"""edgeslim: compress CNNs for embedded devices."""
