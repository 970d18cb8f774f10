from pyro_mcp.cli.app import main

main()
