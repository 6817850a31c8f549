"""Export: GGUF (our lolcats files and llama.cpp's file of each family), ONNX, and the GGUF name table both
our writer and our readers use."""
