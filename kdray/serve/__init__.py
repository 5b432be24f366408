"""The student as it is served: its ONNX forms (`export`) and an ONNX form loaded without torch (`forms`)."""
