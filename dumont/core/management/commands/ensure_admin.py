from django.conf import settings
from django.contrib.auth import get_user_model
from django.core.management.base import BaseCommand, CommandError


class Command(BaseCommand):
    help = "Create the operator account from DUMONT_ADMIN_USER / DUMONT_ADMIN_PASSWORD if it does not exist."

    def handle(self, *args, **options):
        import os

        username = os.environ.get("DUMONT_ADMIN_USER")
        password = os.environ.get("DUMONT_ADMIN_PASSWORD")
        if not username or not password:
            if settings.PRODUCTION:
                raise CommandError("Set DUMONT_ADMIN_USER and DUMONT_ADMIN_PASSWORD: production has no default admin.")
            username, password = username or "admin", password or "admin"
        user_model = get_user_model()
        if user_model.objects.filter(username=username).exists():
            hint = "" if settings.PRODUCTION or os.environ.get("DUMONT_ADMIN_PASSWORD") else " (password: admin unless changed)"
            self.stdout.write(f"admin login: {username}{hint}")
            return
        user_model.objects.create_superuser(username=username, email="", password=password)
        # printed once, when created; never again
        self.stdout.write(self.style.SUCCESS(f"created admin: username={username} password={password}"))
