"""Stage 5: events, the feedback learners' hub, experiments and retraining."""
