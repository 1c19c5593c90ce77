"""Modal screens: confirm, text editing, sampling parameters, help."""

from .confirm import ConfirmScreen
from .help import HelpScreen
from .params import ParamsScreen
from .text_edit import TextEditScreen

__all__ = ["ConfirmScreen", "HelpScreen", "ParamsScreen", "TextEditScreen"]
