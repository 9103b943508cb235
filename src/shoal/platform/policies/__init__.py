"""Scheduling policies, one file each, registered by name in :data:`shoal.registry.POLICIES`:
``fifo``, ``priority``, ``drf``, ``las`` and ``las-bounded``. The shared pass is
:func:`~shoal.platform.policies.base.schedule`."""
