"""The proxy transport between the AIGIS core and plugin processes.

Layers, one direction: ``wire`` (pure encoding and framing) -> ``channel`` (a framed socket)
-> ``client`` (the authenticated channel; one persistent connection per process) -> ``proxy``
(the path objects and the ``aigis`` module plugins see); ``server`` is the core-side endpoint.
"""
