from .cli import main
from .console import exit_program

exit_program(main())
