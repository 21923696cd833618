"""The analyses: each stands on the model view and the hook engine, never on the facade.

- ``lens``: the logit lens; ``tuned``: the tuned lens (train, load, read);
- ``attribution``: direct logit attribution; ``patching``: activation patching sweeps;
- ``atp``: attribution patching (AtP, AtP*, GradDrop) and its tables;
- ``attention``: attention patterns and head scores; ``circuits``: weight-based OV/QK
  circuits and composition scores.
"""
