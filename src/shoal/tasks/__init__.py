"""Tasks, one per file, registered by name in ``shoal.registry.TASKS``: what a
run minimises (the loss) and what it is judged by (the metrics, one of them
main). ``classification`` is the default."""

from shoal.tasks.base import Task, TaskOptions, build_task, improves, reaches

__all__ = ["Task", "TaskOptions", "build_task", "improves", "reaches"]
