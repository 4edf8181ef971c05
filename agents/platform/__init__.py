"""The learned platform of a cascade: its folder (``folder``), how it is fitted from a log (``pipeline``) and where
it loses value stage by stage (``stage_losses``). ``python -m agents.fit_platform`` is the command line.

Submodules are imported by name (``agents.platform.folder``...), so that reading a folder does not import the
fitting code.
"""
