"""The 4-bit group quantization scheme and its application per format."""
