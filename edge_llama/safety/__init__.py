"""Safety: the hook interface and policy, the streaming guard, built-in ONNX classifiers, Llama Guard 3."""
