from edgesqueeze.cli import main

main()
