"""The model as the analyses see it: locators resolved to modules, and what runs after them.

- ``paths``: dotted module paths and the (parent, key, child) chains that say whether the model
  still holds a module where a locator found it;
- ``resolve``: locator -> module -> capture target, cached while those chains hold;
- ``layout``: the ``hidden_states`` layout of a model class (which entry is which locator);
- ``view``: :class:`~introspect._model.view.ModelView`, the final norm, head, logit ops and
  head counts the analyses type against (so none of them imports the facade).
"""
