"""The experiment pipeline over the parts: run split, counterfactual curricula, workspace
merge (`pipeline`). Imports any part below it; used by the binaries and launch/.
"""
