"""The layer-wise proof and its repair on the accuracy pairs: verdicts, forward passes, what changed."""
