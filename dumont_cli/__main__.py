from dumont_cli.main import cli

cli()
