from gptctl.cli import main

main()
