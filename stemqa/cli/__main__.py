from stemqa.cli import main

main()
