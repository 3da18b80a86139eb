from vlpt.cli import entry

entry()
