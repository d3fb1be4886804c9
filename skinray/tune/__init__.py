"""`skinray tune`: Ray Tune searches the classification head's hyperparameters.

`embeddings.py` turns images into the frozen backbone's features once per search; `search.py`
runs the trials (heads on those features, or full Ray Train runs) under ASHA and writes the trial
table and the best configuration.
"""
