"""Built-in methods; importing this package registers them."""
from timm_selfkd.methods.base import LogitsAndFeatures, SelfKDTask
from timm_selfkd.methods.plain import PlainTask
from timm_selfkd.methods.dlb import DLBTask
from timm_selfkd.methods.bake import BAKETask
from timm_selfkd.methods.lsrkd_tfkd import LabelTeacherTask
from timm_selfkd.methods.cskd import CSKDTask
from timm_selfkd.methods.ddgsd import DDGSDTask
from timm_selfkd.methods.self_guidance import SelfGuidanceTask
from timm_selfkd.methods.multi_exit import MultiExitTask
from timm_selfkd.methods.mrkd import MrKDTask, MrKDTCTask
from timm_selfkd.methods.pskd import PSKDTask
from timm_selfkd.methods import uskd, zipfls, dks, frskd, mixskd, rdrop  # noqa: F401  (second wave, issue 17)
from timm_selfkd.methods import stack  # noqa: F401  (registers the stack builder)
