from django.contrib.auth import get_user_model
from django.contrib.auth.backends import ModelBackend


class UsernameOrEmailBackend(ModelBackend):
    """Log in with a username or an email address (case-insensitive for the email)."""

    def authenticate(self, request, username=None, password=None, **kwargs):
        if username is None or password is None:
            return None
        user_model = get_user_model()
        user = user_model.objects.filter(username=username).first()
        if user is None and "@" in username:
            matches = list(user_model.objects.filter(email__iexact=username)[:2])
            user = matches[0] if len(matches) == 1 else None  # an ambiguous email logs nobody in
        if user is None:
            user_model().set_password(password)  # same cost as a real check: no user enumeration by timing
            return None
        if user.check_password(password) and self.user_can_authenticate(user):
            return user
        return None
