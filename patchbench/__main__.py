from patchbench.cli import main

main()
