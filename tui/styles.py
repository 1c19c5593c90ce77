"""The app stylesheet (a Python string, so it ships with the package without package-data)."""

CSS = """
#main { height: 1fr; }
#sidebar { width: 30; border-right: vkey $primary 30%; }
#sidebar.-hidden { display: none; }
#sessions { height: 1fr; max-height: 100%; border: none; padding: 0; text-wrap: nowrap; text-overflow: ellipsis; }
#chat { width: 1fr; }
#view { height: 1fr; padding: 0 1; }
#earlier { color: $text-muted; text-style: italic; margin: 0 0 1 0; }
#status { height: 1; }
#status.-done { display: none; }
#load-label { width: auto; padding: 0 1; }
#load-bar { width: 1fr; }
#meter { height: 1; padding: 0 1; background: $boost; color: $text-muted; }
#meter.-full { color: $warning; }
#prompt { dock: bottom; height: auto; max-height: 8; }
.message { height: auto; margin: 0 0 1 0; padding: 0 1; border-left: thick $primary 40%; }
.message.-user { border-left: thick $accent; }
.message.-out { opacity: 55%; color: $text-muted; }
.message.-pinned { border-left: thick $warning; }
#meter.-unsaved { color: $warning; }
.message.-selected { background: $boost; }
.message > .header { color: $text-muted; text-style: bold; }
MessageView > .message--header { color: $text-muted; text-style: bold; }
.message > .body { margin: 0; padding: 0; }
.dialog { width: 60; height: auto; max-height: 90%; padding: 1 2; border: thick $primary; background: $surface; }
.dialog.wide { width: 90%; }
ConfirmScreen, TextEditScreen, ParamsScreen, HelpScreen { align: center middle; }
.buttons { height: auto; margin-top: 1; }
.buttons Button { margin-right: 2; }
.field { height: auto; }
.field { margin: 0 0 1 0; }
.field .name { width: 20; }
.field Input { width: 1fr; }
#text { height: 12; }
#error { color: $error; }
"""
