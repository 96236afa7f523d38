import os
import sys

# Tests import the project's modules (model, data, kernels) from the repository root.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# There is no GPU here: Triton kernels run in Triton's interpreter on CPU tensors. It must be
# set before triton is first imported. (TRITON_INTERPRET=0 runs them compiled on a GPU.)
os.environ.setdefault("TRITON_INTERPRET", "1")
