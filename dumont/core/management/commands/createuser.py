"""`manage.py createuser NAME [--email E] [--staff] [--password-stdin]`: a user who logs in to the API and the
`dumont` CLI (a second one shows tenant isolation: each sees only their own instances)."""

import sys

from django.core.management.base import BaseCommand, CommandError

from dumont.core.errors import DomainError
from dumont.core.services import user_create


class Command(BaseCommand):
    help = __doc__

    def add_arguments(self, parser):
        parser.add_argument("username")
        parser.add_argument("--email", default="")
        parser.add_argument("--staff", action="store_true", help="may also sign in to the admin (operator)")
        parser.add_argument("--password-stdin", action="store_true",
                            help="read the password from standard input (default: generate one and print it)")

    def handle(self, *args, **options):
        password = sys.stdin.readline().rstrip("\n") if options["password_stdin"] else None
        try:
            user, password = user_create(username=options["username"], email=options["email"], password=password,
                                         staff=options["staff"])
        except DomainError as exc:
            raise CommandError(exc.detail) from None
        shown = "(as given)" if options["password_stdin"] else password  # a generated one is printed once
        self.stdout.write(self.style.SUCCESS(f"created user: username={user.username} password={shown}"))
