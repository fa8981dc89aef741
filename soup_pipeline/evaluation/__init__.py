"""Scoring a model and comparing scores: accuracy and loss on a split, paired statistics, which model select data
prefer, and the tables and plots of the results."""
