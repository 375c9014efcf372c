"""Small utilities every layer may use: atomic files, the distributed environment, dtypes, label conventions."""
