"""The one hook engine: what captures and edits share, and the sites they reach.

- ``session``: :class:`~introspect._hooks.session.HookSession` (enter/exit, the thread scope,
  the staleness and compile checks, accelerate's clean-up) and the one reader of a model call;
- ``capture``: records (``Capture``, ``Record``), the first use of a session;
- ``edits``: interventions (``Intervention``, the edit rules), the second;
- ``heads``: the per-head sites (``q``, ``k``, ``v``, ``z``, ``pattern``, ``scores``, ...) read
  where the model computes them;
- ``norms``: a norm's per-position ``scale``, with its formula per norm class as data.

Nothing here knows an architecture: the model layer (:mod:`introspect._model`) hands it
targets.
"""
