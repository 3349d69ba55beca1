"""The model: the checkpoint as shipped, the XVERSE decoder (xverse.XverseForCausalLM) with its pure-PyTorch
reference attention over the paged KV cache, weight quantization, the tokenizer and XVERSE's chat format."""
