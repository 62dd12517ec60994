"""lmc's core: the graph IR and its helpers, shapes, weights, onnxruntime sessions, the pass contract and
manager, errors and bundle metadata — what passes, targets and the compiler driver all import; it imports
none of them."""
