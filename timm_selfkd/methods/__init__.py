"""Built-in methods; importing this package registers them."""
from .base import LogitsAndFeatures, SelfKDTask
from .plain import PlainTask
from .dlb import DLBTask
from .bake import BAKETask
from .self_guidance import SelfGuidanceTask
from .multi_exit import MultiExitTask
