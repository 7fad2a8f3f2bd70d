from factorize_cli.cli import main

main()
