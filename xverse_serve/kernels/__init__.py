"""The GPU kernels, in Triton: paged decode attention, the fused elementwise stages, the one-row GEMVs and the
quantized matmuls. Each is tested against its pure-PyTorch twin in model/ (on the CPU through TRITON_INTERPRET=1)."""
