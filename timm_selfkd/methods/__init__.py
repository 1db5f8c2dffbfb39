"""Built-in methods; importing this package registers them."""
from .base import LogitsAndFeatures, SelfKDTask
from .plain import PlainTask
from .dlb import DLBTask
from .bake import BAKETask
from .label import LabelTeacherTask
from .cskd import CSKDTask
from .ddgsd import DDGSDTask
from .self_guidance import SelfGuidanceTask
from .multi_exit import MultiExitTask
from .mrkd import MrKDTask, MrKDTCTask
from .pskd import PSKDTask
